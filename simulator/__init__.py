"""The offline cluster simulator: many sim-engine instances in virtual time, driven by the same
policy code as the live scheduler (dispatch, migration rounds, scaling)."""
