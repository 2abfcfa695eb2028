"""The paid request path. flow.py reads top to bottom; call.py decodes and binds a payment;
replay.py answers a payment seen before; settle.py settles and delivers; metered.py prices upto
calls; responses.py renders challenges, receipts and refusals.

Import the modules themselves (this package's __init__ imports nothing, so session calls can use
call.py and metered.py without a cycle through flow.py)."""
