"""What a guest boots: assets, kernels, initramfs, DTBs, cloud-init seeds."""
