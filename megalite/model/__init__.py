"""The model: the decoder-only transformer written like single-device code out of layer
factories (transformer.py), its layout-independent initialisation (init.py), building it
for a layout (build.py) and sampling from it (sampling.py)."""
