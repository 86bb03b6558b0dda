"""llama.cpp's llama-server: building it once, finding the model, and the engine adapter."""
