"""derecho-py transport over libfabric (cffi API mode): providers ``verbs``, ``tcp`` and others.

``derecho_transport_verbs.fabric`` is the thin libfabric wrapper;
``derecho_transport_verbs.transport`` implements the transport contract;
``derecho_transport_verbs.plugin`` registers the provider names.
"""

__version__ = "0.1.0"
