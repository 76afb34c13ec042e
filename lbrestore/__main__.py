from lbrestore.cli import main

main()
