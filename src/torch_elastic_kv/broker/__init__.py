"""The memory broker: one daemon per device shares its KV budget between tenant processes.

``daemon`` (the broker process), ``arbiter`` (who gets what), ``protocol`` (the wire format),
``client`` (a tenant's side: ``BrokerClient``, handed to the Engine, or borrowing a fixed
lease for any workload), ``borrow`` (the command that runs a program on a borrowed lease),
``top`` (the operator's view). See docs/BROKER.md.
"""
