"""Pure replica pickers over snapshots: no I/O, no clock reads."""
