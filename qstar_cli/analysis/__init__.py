"""What a run's diagnostics say: statistics and weights, tables, plots, the HTML report and the training export."""
