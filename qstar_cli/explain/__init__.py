"""``qstar explain``: q* on two 2-D Gaussians, closed form beside ``solve_alpha`` on a grid, with figures."""
