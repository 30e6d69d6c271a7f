"""Fine-tuning: the optimizer (``optim``), the train step (``step``), ONE loop for one run or a
group of runs (``loop``), task-vector export (``export``), device meshes (``sharding``) and
metric logs (``metrics_log``)."""
