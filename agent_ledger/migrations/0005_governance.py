from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("agent_ledger", "0004_resumption"),
    ]

    operations = [
        migrations.AddField(
            model_name="effect",
            name="expires_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="effect",
            name="expiring_notified_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="effect",
            name="superseded_by",
            field=models.UUIDField(blank=True, null=True),
        ),
        migrations.AddIndex(
            model_name="effect",
            index=models.Index(
                condition=models.Q(("expires_at__isnull", False), ("status", "requires_approval")),
                fields=["expires_at"],
                name="agent_ledger_expiring",
            ),
        ),
    ]
