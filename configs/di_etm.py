"""Discrete Interpolants, explicit-timestep model (ETM; FID 3.34 in the paper's Table 3):
a sinusoidal embedding of t is added to the class prefix token (``model.time_cond='explicit'``;
how t enters is unstated in the paper). 1,000 sampling steps. See configs/di_imagenet.py.
"""
from configs.di_imagenet import di_config


def get_config():
    return di_config("explicit")
