module duet/ollama_template

go 1.19
