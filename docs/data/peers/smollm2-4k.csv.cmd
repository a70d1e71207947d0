~/.cache/livekvq/venv-llama/bin/python bench/peers_kv.py -m models/SmolLM2-135M-Instruct.Q4_1.gguf -c 4096 -o docs/data/peers/smollm2-4k.csv --llama-types f16,q8_0,iq4_nl,q4_0,q5_0,q4_1 --no-fast
~/.cache/livekvq/venv-llama/bin/python bench/peers_kv.py -m models/SmolLM2-135M-Instruct.Q4_1.gguf -c 4096 -o docs/data/peers/smollm2-4k.csv --llama-types '' --exact --ours 'int4=--kv-cache int4'
~/.cache/livekvq/venv-llama/bin/python bench/peers_kv.py -m models/SmolLM2-135M-Instruct.Q4_1.gguf -c 4096 -o docs/data/peers/smollm2-4k.csv --llama-types '' --no-fast --exact --ours 'k3v2=--kv-cache k3v2'
