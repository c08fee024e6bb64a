"""A local, stateful Stripe test-mode API for the official SDK: `StripeEmulator`.

```python
from metered_middleware.testing.emulator import StripeEmulator

with StripeEmulator(rate_limit=None) as emu:
    client = emu.client()
    customer = client.v1.customers.create({"email": "ada@example.com"})
```
"""

from ._app import EmulatorApp
from ._errors import EmulatorError
from ._faults import FAULT_KINDS
from ._server import DEFAULT_RATE_LIMIT, EmulatorHTTPXClient, StripeEmulator
from ._state import MeterEvent, RequestRecord
from ._webhooks import Delivery, sign

__all__ = [
    "DEFAULT_RATE_LIMIT",
    "FAULT_KINDS",
    "Delivery",
    "EmulatorApp",
    "EmulatorError",
    "EmulatorHTTPXClient",
    "MeterEvent",
    "RequestRecord",
    "StripeEmulator",
    "sign",
]
