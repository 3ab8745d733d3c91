"""The admin dashboard at /admin: sessions and access rules, settings as the page edits them, and
the page itself (`static/`: plain HTML, CSS and JavaScript modules, with uPlot vendored under
`static/vendor/`; nothing is built at install time or fetched at run time). Its routes are
`daemon/routes/dashboard.py` (page, files, sign-in) and `daemon/routes/dashboard_api.py` (data, steering)."""
