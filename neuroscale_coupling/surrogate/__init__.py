"""The SANO model as an artefact: architecture (:mod:`~neuroscale_coupling.surrogate.config`),
inputs (:mod:`~neuroscale_coupling.surrogate.inputs`), encoders, attention, decoders,
uncertainty and calibration, the loss, the model (:mod:`~neuroscale_coupling.surrogate.
model`) and the model file with :class:`~neuroscale_coupling.surrogate.model_file.
Surrogate`, the one door to a trained model. Importing this package is light (no torch);
the submodules import it.
"""
