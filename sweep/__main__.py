from sweep.cli import program

program()
