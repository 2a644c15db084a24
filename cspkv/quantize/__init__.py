"""fp16 and int8 variants of an fp32 export folder, and the calibration data int8 needs.

graph.py (reading and rewriting the exported graphs), fp16.py, int8.py (one graph each),
calibration.py and calibration_prompts.py (recorded feeds from TRAIN-split prompts), convert.py
(a whole export folder: csp-export, csp-bench and the precision table go through it), sensitivity.py
(which modules int8 may touch, measured on held-out TRAIN prompts).
"""
