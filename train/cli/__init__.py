"""The command lines: argv -> `RunSpec` (parse.py), the training entry point and `train.fit` (entry.py),
evaluation (evaluate.py), transfer (transfer.py), and how a command ends (exits.py). The modules at
train/'s top (`python -m train`, train.sentiment, ... train.evaluate, train.transfer) are the names you type;
each hands over to one of these.
"""
