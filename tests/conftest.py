"""Makes the shared test helpers beside this file (processes.py) importable from every test folder."""
