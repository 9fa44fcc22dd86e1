"""How to run fairgate: the ``fairgate`` command line and deployment files."""
