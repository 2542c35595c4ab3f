"""Operations: the cluster files' checks and a fake multi-node cluster on one machine.

- ``checks``: what ``python -m reckoning_ray.cluster check`` verifies in a cluster YAML;
- ``pins``: the node software's pinned versions and the ``pip install`` commands of a text;
- ``jobs``: a machine's GPU model resources and the sweep job submitted to a cluster;
- ``fake_cluster``: a Ray head with the fake multi-node provider, for local runs and tests.
"""
