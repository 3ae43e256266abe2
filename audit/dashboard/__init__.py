"""Support code for the Streamlit review dashboard (``app.py``).

* :mod:`audit.dashboard.thumbs`: image paths confined to the dataset root, and
  cached thumbnails.
* :mod:`audit.dashboard.serve`: start the app on a free localhost port (for the
  browser test and the screenshot script).

Every query the dashboard runs lives in :mod:`audit.queries`.
"""
