"""What a run's diagnostics say: statistics and weights, tables, plots, the HTML report and the training export."""

#: The smallest ESS/n the tempered weights w^gamma may have (``--ess-floor``, and the report's weights).
ESS_FLOOR = 0.3
