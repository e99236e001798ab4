"""The memory broker: one daemon per device shares its KV budget between tenant processes.

``daemon`` (the broker process), ``arbiter`` (who gets what), ``protocol`` (the wire format),
``client`` (a tenant's side: ``BrokerClient``, handed to the Engine), ``top`` (the operator's
view). See docs/BROKER.md.
"""
