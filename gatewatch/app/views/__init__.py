"""The dashboard's page scripts, run by ``st.navigation`` from ``gatewatch/app/main.py``."""
