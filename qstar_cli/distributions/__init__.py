"""Pure tensor maths over ``[batch, vocab]`` log-probabilities: the mixture q and alpha, sampling from it, and the speculative acceptance rule. No models, no I/O."""
