"""The broker's Redis Cluster client (``redis.cluster: true``).

redis-py's ``RedisCluster`` with the single Redis's arguments (password from the
environment, TLS CA, socket timeouts, no retries of its own). ``redis.url`` names one
node (``redis://host:port/0``, redis-py's ``from_url``) or several, comma-separated
(``redis://h1:p1,h2:p2,h3:p3/0``): any one that answers gives the cluster's map, so a
broker starts while one node is down. The key layout (hash tags) and the grouping of
script calls by slot are ``broker.state.keys``'s; the wait for replicas after writes is
``broker.state.store.wait_for_replicas``.

``CONFIG GET`` (the broker's start-up check of ``maxmemory-policy`` and ``appendonly``)
is asked of every primary: a value is the nodes' common one, and nodes that disagree are
an error naming them (one node that evicts is a node that loses light curves).
"""
from __future__ import annotations

from urllib.parse import unquote, urlsplit

from redis.cluster import ClusterNode, RedisCluster

from broker.errors import BrokerError


def startup_nodes(url: str) -> tuple[list[tuple[str, int]], bool, dict]:
    """(host, port) of every node in ``url``, whether it is TLS (``rediss://``), and the
    user name/password it carries (from ULENS_REDIS_URL: a file may not hold one)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise BrokerError(f"redis.cluster needs a redis:// or rediss:// url, not {parts.scheme}://")
    netloc = parts.netloc
    auth = {}
    if "@" in netloc:
        info, netloc = netloc.rsplit("@", 1)
        user, colon, rest = info.partition(":")
        if user:
            auth["username"] = unquote(user)
        if colon:
            auth["password"] = unquote(rest)
    nodes = []
    for item in netloc.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise BrokerError(f"redis.url: {item.strip()!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    db = parts.path.strip("/")
    if db not in ("", "0"):
        raise BrokerError(f"redis.url: Redis Cluster has database 0 only, the url names {db}")
    return nodes, parts.scheme == "rediss", auth


def cluster_client(url: str, **kwargs):
    """A :class:`ClusterClient` for ``url`` (one or several nodes) with redis-py's
    client arguments (``retry``, ``password``, ``ssl_ca_certs``, socket timeouts)."""
    nodes, tls, auth = startup_nodes(url)
    kw = {**auth, **kwargs}
    if tls:
        kw["ssl"] = True
    return ClusterClient(startup_nodes=[ClusterNode(h, p) for h, p in nodes], **kw)


class ClusterClient(RedisCluster):
    """``RedisCluster`` whose ``config_get`` answers for the whole cluster (every primary)."""

    def config_get(self, pattern: str = "*", *args, **kwargs) -> dict:
        return merge_config({node.name: node.redis_connection.config_get(pattern, *args)
                             for node in self.get_primaries()})


def merge_config(per_node: dict[str, dict]) -> dict:
    """One ``CONFIG GET`` answer from every primary's: the values they share; a BrokerError
    naming the nodes when they disagree on one."""
    out: dict = {}
    for name in sorted({k for conf in per_node.values() for k in conf}):
        values = {node: conf.get(name) for node, conf in per_node.items()}
        if len(set(values.values())) > 1:
            raise BrokerError(f"the Redis Cluster's primaries disagree on {name}: "
                              + ", ".join(f"{n} {v}" for n, v in sorted(values.items()))
                              + "; set it alike on every node (CONFIG SET, and in each redis.conf)")
        out[name] = next(iter(values.values()))
    return out
