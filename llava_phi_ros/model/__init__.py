"""Pure PyTorch LLaVA-Phi: configs, vision tower, projector, Phi, prompt, generation. No ROS."""
