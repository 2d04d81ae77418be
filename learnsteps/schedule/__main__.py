"""python -m learnsteps.schedule export FILE --to comfyui|a1111|sigmas|diffusers|k-diffusion"""
from learnsteps.interop.export import main

raise SystemExit(main())
