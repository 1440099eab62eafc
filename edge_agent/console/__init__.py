"""``edge-agent console``: a live fleet console in the browser (host side, extra ``console``).

:mod:`.state` keeps what the broker says about each device, :mod:`.jobs` runs the ``remote``
commands (benchmark, models, deploy, rollback) with their own code, :mod:`.app` is the web app
(page, JSON API, Server-Sent Events, access rules) and :mod:`.server` starts it. The page is
plain HTML/JS/CSS in ``static/`` (no build step).
"""
