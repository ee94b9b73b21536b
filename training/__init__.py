"""Train the notebook's AlexNet on CIFAR-10 and write checkpoints the app can serve.

`training.model` and `training.preprocess` are imported by the app too: they are the one
definition of the network and of what an image becomes before it reaches the network.
"""
