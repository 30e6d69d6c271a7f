"""Evaluation: device-resident batches, packed text inputs (``packing``) and the grid evaluator
that runs K merged models through one compiled program (``grid``)."""
