"""Where owca-ship puts what it ships: one module per kind of storage.

BUILTINS is their one list; owca-ship declares it to the configuration loader,
which imports a storage's module only when a configuration names its tag (Kafka's
client is not loaded for a node that ships to a file).
"""
BUILTINS = {
    "StdoutStorage": "owca.ship.storages.local:StdoutStorage",
    "LogStorage": "owca.ship.storages.local:LogStorage",
    "FileStorage": "owca.ship.storages.local:FileStorage",
    "KafkaStorage": "owca.ship.storages.kafka:KafkaStorage",
    "PrometheusStorage": "owca.ship.storages.prometheus:PrometheusStorage",
    "KubernetesNodeStatusStorage":
        "owca.ship.storages.kubernetes_node:KubernetesNodeStatusStorage",
}
