"""The code location's definitions, one folder per system, collected by the defs-folder loader."""
