"""Models and their evaluation: recommender, online model, uplift, OPE, metrics."""
