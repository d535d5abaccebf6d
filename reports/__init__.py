"""Tables, plots and report rendering, from a run folder alone."""
