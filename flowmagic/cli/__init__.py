"""The console command ``flowmagic``: option parsing and rendering over the services."""
