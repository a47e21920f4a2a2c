"""Pure PyTorch LLaVA-Phi: configs, vision tower, projector, Phi decoder, prompt, preprocessing, generation. No ROS."""
