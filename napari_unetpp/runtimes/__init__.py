"""What runs the network and where: device and precision, PyTorch, ONNX Runtime, OpenVINO, int8."""
