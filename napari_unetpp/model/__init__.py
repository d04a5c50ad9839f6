"""The network and its files: UNet++ (nodes ``x_i_j``, heads ``head_j``), model cards, versions, new models."""
