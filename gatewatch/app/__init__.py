"""The Streamlit dashboard (entry: ``main.py``; pages: ``views/``). Start it with ``gatewatch dashboard``."""
