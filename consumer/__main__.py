"""`python -m loram ...` is the `loram` command; multi-process launchers use it:

    torchrun --nproc_per_node 2 -m loram publish align PRUNED --data wiki --steps 100 --seq-len 256 --out aligned
"""

from loram.command import main

main()
