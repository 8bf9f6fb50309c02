"""The cluster as `make cluster-up` leaves it: three Synced nodes, one writer behind HAProxy,
and a health check that lets through only nodes fit to serve."""

import pymysql
import pytest

from scripts import cluster
from scripts.cluster_check import NodeState, verdict
from settings import Settings


def proxied_node_names(connections: int) -> set[str]:
    config = Settings()
    names = set()
    for _ in range(connections):
        with (
            pymysql.connect(
                host=cluster.HOST,
                port=cluster.PROXY_PORT,
                user=config.db_user,
                password=config.db_password.get_secret_value(),
            ) as connection,
            connection.cursor() as cursor,
        ):
            cursor.execute("SELECT @@wsrep_node_name")
            row = cursor.fetchone()
            assert row is not None
            names.add(str(row[0]))
    return names


def test_three_synced_nodes_form_one_primary_cluster(cluster_up: None) -> None:
    for node in cluster.NODES:
        status = cluster.node_status(node, Settings())
        assert status is not None, f"{node.name} does not answer"
        assert status["wsrep_cluster_size"] == "3"
        assert status["wsrep_cluster_status"] == "Primary"
        assert status["wsrep_local_state"] == "4", status["wsrep_local_state_comment"]
        assert status["wsrep_ready"] == "ON"


def test_haproxy_sends_every_connection_to_node_1(cluster_up: None) -> None:
    assert cluster.haproxy_servers() == {"n1": "UP", "n2": "UP", "n3": "UP"}
    assert proxied_node_names(10) == {"n1"}
    assert cluster.haproxy_writer() == "n1"


def test_a_node_not_synced_is_kept_out() -> None:
    synced = NodeState(4, "Synced", ready=True, primary=True, sst_method="mariabackup")
    assert verdict(synced)[0]
    for state in (
        NodeState(1, "Joining", ready=False, primary=True, sst_method="mariabackup"),
        NodeState(3, "Joined", ready=True, primary=True, sst_method="mariabackup"),
        NodeState(4, "Synced", ready=False, primary=True, sst_method="mariabackup"),
        NodeState(4, "Synced", ready=True, primary=False, sst_method="mariabackup"),
        NodeState(2, "Donor/Desynced", ready=True, primary=True, sst_method="rsync"),
    ):
        assert not verdict(state)[0], state


@pytest.mark.parametrize("method", ["mariabackup"])
def test_a_donor_that_keeps_serving_stays_in(method: str) -> None:
    donor = NodeState(2, "Donor/Desynced", ready=True, primary=True, sst_method=method)
    up, why = verdict(donor)
    assert up, why
