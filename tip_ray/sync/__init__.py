"""Weight sync from the learner to the rollout engines: the transports the trainer calls
(transports: the object store, or a collective broadcast), the weight process group they broadcast
over (process_group), and the buckets that pack parameters for it (buckets).
"""
