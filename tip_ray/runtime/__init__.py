"""The runtime: Ray placement of the three pools (placement), the thin actor shells around the
plain workers (actors), the learner group that drives the ranks together (learner_group), and the
rollout and teacher pools that shard work over their actors with deadlines and retries (pools).
"""
