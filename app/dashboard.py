"""The dashboard from a checkout: ``streamlit run app/dashboard.py -- --runs RUNS_DIR``.

The app itself lives in the package (``gatewatch/app/``) so that it also works after ``pip install``;
``gatewatch dashboard RUNS_DIR`` starts the same app.
"""

from gatewatch.app.main import main

main()
