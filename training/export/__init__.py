"""Export: GGUF (llama.cpp's converter, duet's LoRA writer), llama.cpp's verdict, the Ollama Modelfile."""
