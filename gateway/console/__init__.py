"""The operator's console: server-rendered pages under {admin_prefix}/console to see and steer
agents, budgets, spend and settlements, behind the admin token.

  app.py          create_console_app: the gate (session, same-origin POSTs), security headers, login
  session.py      signed session cookies and CSRF tokens
  views.py        the pages: overview, agents, groups, ledger, settlements, reconciliation
  admin_calls.py  the budgets admin API, called in process
  forms.py        form bodies and the policy form (token units, inline field errors)
  charts.py       SVG time series
  reconcile.py    the Reconciliation page's source (Reconciler)
  templates/, static/   Jinja2 templates and the stylesheet

No script runs in the pages (the Content-Security-Policy allows none); nothing is loaded from
outside the gateway.
"""

from gateway.console.app import create_console_app
from gateway.console.reconcile import Reconciler, ReconcileRow

__all__ = ["ReconcileRow", "Reconciler", "create_console_app"]
