"""The page of ``tledge-runtime serve``: a browser view of the model, its answers and its figures.

``static/`` holds the page's files (HTML, one script, one style sheet, an icon; no build step, nothing fetched
from elsewhere); :mod:`tledge_runtime.serve.page.site` serves them.
"""
