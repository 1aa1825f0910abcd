"""Train a stage inside a fixed budget on a lent GPU: ``conceptattention_lab.gpu_train`` (see its description).

python lab/scripts/gpu_train_shapes.py --config lab/stages/stage03.json --run /tmp/run --export OUT/s3 --budget 420
python lab/scripts/gpu_train_shapes.py --join OUT/s3 --run runs/s3
"""

from conceptattention_lab.gpu_train import main

if __name__ == "__main__":
    main()
