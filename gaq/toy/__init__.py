"""The project's own small models and data: the digits and photo-crop datasets, the DDPM UNet trained on them
(``default_model``) and the classifier whose features score samples. Below the pipeline, beside ``gaq.data``:
calibration and evaluation use them; they use nothing above ``gaq.models``."""
