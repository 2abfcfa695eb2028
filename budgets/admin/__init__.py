"""The operator's admin API for budgets: policies (agents and groups), usage, suspend/resume and
the ledger, behind a bearer token, described by an OpenAPI 3.1 document built from the same
route table that serves it.

Amounts are integers in base units, sent as decimal strings (JSON numbers are accepted on input
when they are whole); every amount in a response also has a display form ("5 OPG") when the
asset is known.

  app.py        create_admin_app: routes, auth middleware, exception handlers
  auth.py       BearerAuth: the token check, ahead of routing
  routes.py     the route table (method, path, handler, summary)
  handlers.py   AdminApi: one method per route
  requests.py   path, query and body parameters checked into values
  bodies.py     reading a JSON body safely (size and nesting caps)
  responses.py  the response documents, the ledger as JSON lines or CSV
  openapi.py    the OpenAPI document
  errors.py     AdminError, InvalidRequestError and their one rendering

Its HTTP client (for the CLI and tests) is budgets.admin_client.AdminClient.
"""

from budgets.admin.app import create_admin_app
from budgets.admin.auth import BearerAuth
from budgets.admin.bodies import MAX_BODY_BYTES
from budgets.admin.errors import AdminError, InvalidRequestError
from budgets.admin.handlers import AdminApi
from budgets.admin.openapi import openapi_document
from budgets.admin.requests import LEDGER_MAX, MAX_AMOUNT, parse_policy, parse_time
from budgets.admin.responses import LEDGER_COLUMNS, iso, policy_doc
from budgets.admin.routes import ROUTES
from budgets.amounts import Assets, display

__all__ = ["LEDGER_COLUMNS", "LEDGER_MAX", "MAX_AMOUNT", "MAX_BODY_BYTES", "ROUTES", "AdminApi", "AdminError", "Assets",
           "BearerAuth", "InvalidRequestError", "create_admin_app", "display", "iso", "openapi_document",
           "parse_policy", "parse_time", "policy_doc"]
